"""Durable jobs: kinds (registry, RunContext), the executor seam, the job service and its events."""

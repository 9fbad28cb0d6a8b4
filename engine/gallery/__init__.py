"""The gallery: Asset/Generation records and queries, thumbnails, and image metadata (A1111 infotext, PNG Info)."""

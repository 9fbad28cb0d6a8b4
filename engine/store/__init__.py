"""The database: SQLModel tables, the Database object, file hashes."""

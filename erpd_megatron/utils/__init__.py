"""Small shared utilities (logging, atomic files, hashing)."""

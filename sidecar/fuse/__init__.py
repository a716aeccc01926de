"""The FUSE frontend: a read-only view of one snapshot (pyfuse3 on asyncio)."""

"""The project's local NDIF harness: `scripts/ndif-local` (see harness.py for the details)."""

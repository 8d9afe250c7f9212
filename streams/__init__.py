"""Faust stream workers: the live shell around meltica/ (DESIGN.md §2, §3). Workers hold no business rules."""

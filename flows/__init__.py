"""Prefect flows: the batch shell around meltica/ (DESIGN.md §2). Flows hold no business rules."""

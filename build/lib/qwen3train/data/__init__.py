"""Training data: records, indexed sources, batch plans, collation."""

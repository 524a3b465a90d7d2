"""Dataset specs, one module per dataset family; importing registers them."""

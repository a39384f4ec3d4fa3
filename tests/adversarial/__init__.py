"""Adversarial billing tests: clients that try to get priced results without paying for them."""

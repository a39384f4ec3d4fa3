"""Fault injection: the real gateway process in front of an audited upstream process, under fire."""

"""Running the gateway: the CLI, serve (and its workers), the demo and the demo upstream. Nothing imports
this package.
"""

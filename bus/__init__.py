"""The bus: events, status tables, subjects, publishing and the local spool.

`receiver` (HTTP in) and `pollers` (HTTP out) both import this package and never each other.
"""

"""The entry point and the composition root: the CLI (`smsbus.cli`) and the wiring of the
receiver, the pollers and the bus into one process (`smsbus.serve`). Imports run one way:
`smsbus` -> `receiver`, `pollers` -> `bus`."""

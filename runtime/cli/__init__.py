"""The `polysense` command: one module per command group."""

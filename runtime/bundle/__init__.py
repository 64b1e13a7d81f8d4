"""The bundle: its description (schema, settings), reading it, archives, graph checks, slimming."""

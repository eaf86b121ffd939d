"""The `pathotune` command."""

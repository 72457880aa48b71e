"""Control plane: filled in by the control-plane issue (#4)."""

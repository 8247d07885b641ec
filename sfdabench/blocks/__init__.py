"""Building blocks a method may use (networks, training loops, losses)."""

"""Other servers' wire formats, as pure functions of bodies and loaded models."""

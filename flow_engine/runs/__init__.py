"""Running compiled flows and recording what happens while they run."""

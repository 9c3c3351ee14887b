"""HTTP API blueprints. Handlers parse and answer; the logic lives in the services."""

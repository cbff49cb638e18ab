"""The operator surface over HTTP: config_dump sections, health and readiness."""

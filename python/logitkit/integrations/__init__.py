"""Optional integrations of logitkit with other libraries (imported lazily)."""

"""The spec language: Pydantic models, YAML loading, patterns and ratios, errors."""

"""The API's blueprints, one per feature: prediction, model information, operations."""

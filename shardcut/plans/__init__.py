"""The plan and score formats, criteria and selection, importers of published scores."""

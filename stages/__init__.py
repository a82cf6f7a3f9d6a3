"""tunepipe: DVC stages and the shared code they use (params, data, modeling, tracking)."""

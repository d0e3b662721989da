"""Fine-tuning through the API: the recipe (recipe.py) and the adapter file it makes
(export.py). Runs in workers started with trainings enabled, never in the gateway."""

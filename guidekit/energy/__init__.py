"""Energy estimators, energy transforms and scale mappers for SAMG (spatially adaptive guidance)."""

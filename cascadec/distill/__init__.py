"""Knowledge-distillation losses."""

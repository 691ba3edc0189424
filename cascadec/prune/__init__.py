"""Channel pruning: dependency groups, masks after BatchNorm, cost model, shrink, artifacts."""

"""Layer 6, experiments: the tables the notebooks show (MCUB composition table, merging-algorithm zoo)."""

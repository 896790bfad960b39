"""Layer 5, evaluation: protocols and accuracies with intervals, MCUB files, single-modality and capability tasks."""

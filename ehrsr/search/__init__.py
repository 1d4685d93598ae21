"""The search: spaces, budget, multi-fidelity early stopping, the study driver and its storage."""

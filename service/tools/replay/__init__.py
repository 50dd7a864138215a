"""`python -m service replay`: send dead letters back to their source topic."""

"""The algorithm pieces of POPri and the baselines (scoring, preference pairs, prompts, the
public set, PE votes and variations, DP-FedAvg updates): plain numpy/torch, no Flower."""

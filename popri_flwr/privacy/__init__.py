"""The privacy mechanism: clipping, secret randomness, Poisson sampling, the noisy sum,
accounting (PLD / RDP) and the diagnostics kept out of the release. No Flower imports."""

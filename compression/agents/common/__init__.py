"""Pieces the agents share (as Stable-Baselines3's ``common/``): replay buffer, exploration noise, networks,
and RNG state helpers. Nothing here knows about a particular agent or environment."""

"""nftsg side effects: lab builder, nft backend, state store, agent and command line."""

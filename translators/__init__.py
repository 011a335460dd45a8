"""nftsg pure core: the security-group model, its semantics and the nftables compiler."""

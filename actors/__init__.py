"""Ray: actors that each own models on one device, and the coordinator that runs many chains through them."""

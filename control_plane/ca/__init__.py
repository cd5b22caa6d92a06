"""The mesh certificate authority: workload certificates with SPIFFE IDs."""

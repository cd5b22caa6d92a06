"""xDS v3: resources built from the mesh, the snapshot cache, and the per-stream protocol."""

"""Identity resolution: identifiers, the identity graph, stitching rules, merge conflicts."""

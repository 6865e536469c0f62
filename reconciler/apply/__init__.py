"""The apply transaction: converge the node to HEAD in a fixed order, with its failure policy."""

"""p-Meta: few-shot adaptation on the device that updates only the weights that matter (see docs/adapt.md)."""

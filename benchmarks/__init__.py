"""Speed and quality measurements of SenCache against the uncached run."""

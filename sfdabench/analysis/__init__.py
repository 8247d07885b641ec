"""Analysis of rows and run folders: leaderboards, statistics, compare, ablate, report."""

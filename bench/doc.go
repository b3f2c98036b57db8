// Package bench owns govmm's reproducible benchmarks: each suite runs
// govmm and, where one is installed, its peer (QEMU) side by side in the
// same run on the same guest, keeps every sample as CSV, and summarises
// medians, spread and ratios in report.md.
package bench

//go:build !amd64 || purego

package stream

// blocksVector is nil: this build sums with blocksScalar alone.
var blocksVector blockFunc

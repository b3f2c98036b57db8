//go:build !amd64 || purego

package aegis

// No AES round in hardware that this package knows how to use: New and
// NewX2 say ErrUnsupported, and the stream seals with AES-256-GCM.
const (
	supported   = false
	supportedX2 = false
)

func absorb(*state, []byte)              { panic("aegis-128l: unsupported") }
func encBlocks(*state, []byte, []byte)   { panic("aegis-128l: unsupported") }
func decBlocks(*state, []byte, []byte)   { panic("aegis-128l: unsupported") }
func absorbX2(*state, []byte)            { panic("aegis-128x2: unsupported") }
func encBlocksX2(*state, []byte, []byte) { panic("aegis-128x2: unsupported") }
func decBlocksX2(*state, []byte, []byte) { panic("aegis-128x2: unsupported") }

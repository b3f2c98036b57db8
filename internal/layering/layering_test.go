package layering

import (
	"bufio"
	"bytes"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rank places every package of the module on a floor: a package may
// import only packages on lower floors. A new package must be given a
// floor here, which is the moment to decide where it belongs.
var rank = map[string]int{
	// Leaves: the KVM ABI, the pieces of a machine that devices share,
	// the control API's types, test support that needs nothing of govmm.
	"kvmapi":                       0,
	"kvmapi/internal/kabi":         0,
	"vmm/guestmem":                 0,
	"vmm/guestmem/internal/uabi":   0,
	"vmm/devstate":                 0,
	"vmm/container":                0,
	"vmm/pci":                      0,
	"ctlapi":                       0,
	"guestimg/internal/guestproto": 0,
	"guestimg/guest/demo":          0,
	"guestimg/guest/dirtier":       0,
	"internal/netns":               0,
	"internal/democlient":          0,
	"internal/tinyguest":           0,
	"internal/promcheck":           0,
	"internal/layering":            0,
	"internal/boottrace":           0,
	"replicate/internal/kdf":       0,
	"replicate/internal/aegis":     0,

	// Beside the machine: the dirty set, devices, the guest image.
	"dirtylog":            1,
	"virtio":              1,
	"guestimg":            1,
	"guestimg/guest/init": 1,

	"vmm":            2,
	"virtio/netback": 2,
	"lab":            2,

	"replicate/stream":  3,
	"internal/kvmtest":  3,
	"internal/guestrig": 3,
	"replicate/witness": 4,
	"replicate":         5,

	"bench":                              6,
	"internal/tinyguest/cmd/mkdirtier":   6,
	"internal/democlient/cmd/democlient": 6,

	"cmd/govmm": 7,
}

// runtime are the packages a running VMM is made of; they import no
// benchmark, image builder, lab or test support.
var runtime = []string{"kvmapi", "vmm", "virtio", "dirtylog", "replicate", "ctlapi"}

// outside are what the runtime must not import.
var outside = []string{"bench", "guestimg", "lab", "internal", "cmd"}

// under reports whether pkg is p or one of its subpackages.
func under(pkg, p string) bool { return pkg == p || strings.HasPrefix(pkg, p+"/") }

// imports maps each package of the module to the module packages its
// non-test files import (tests may use test support freely).
func imports(t *testing.T) map[string][]string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("needs the go command: %v", err)
	}
	cmd := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, "govmm/...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "go list: %s", stderr.String())
	g := map[string][]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		pkg := strings.TrimPrefix(f[0], "govmm/")
		g[pkg] = nil
		for _, imp := range f[1:] {
			if strings.HasPrefix(imp, "govmm/") {
				g[pkg] = append(g[pkg], strings.TrimPrefix(imp, "govmm/"))
			}
		}
	}
	require.NotEmpty(t, g)
	return g
}

// Imports point down: every package has a floor, and imports only from
// floors below it.
func TestImportsPointDown(t *testing.T) {
	for pkg, imps := range imports(t) {
		r, ok := rank[pkg]
		if !assert.True(t, ok, "package %s has no floor in layering_test.go's rank: give it one", pkg) {
			continue
		}
		for _, imp := range imps {
			assert.Less(t, rank[imp], r, "%s (floor %d) imports %s (floor %d): imports must point down", pkg, r, imp, rank[imp])
		}
	}
}

// The seams STYLE.md draws: vmm knows no device model (devices satisfy
// its interfaces, the command wires them in), virtio reaches the machine
// only through vmm's leaf packages, and the runtime imports nothing from
// the benchmarks, the image builder, the lab or test support.
func TestSeams(t *testing.T) {
	for pkg, imps := range imports(t) {
		for _, imp := range imps {
			if under(pkg, "vmm") {
				assert.False(t, under(imp, "virtio") || under(imp, "replicate"), "%s imports %s", pkg, imp)
			}
			if under(pkg, "virtio") {
				assert.NotEqual(t, "vmm", imp, "%s imports vmm: use vmm/guestmem, vmm/pci, vmm/devstate", pkg)
			}
			if slices.ContainsFunc(runtime, func(p string) bool { return under(pkg, p) }) {
				assert.False(t, slices.ContainsFunc(outside, func(p string) bool { return under(imp, p) }),
					"runtime package %s imports %s", pkg, imp)
			}
		}
	}
}

// The user's binary carries no test code: neither package testing nor
// govmm's test support is linked into it.
func TestBinaryHasNoTestCode(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("needs the go command: %v", err)
	}
	cmd := exec.Command("go", "list", "-deps", "govmm/cmd/govmm")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "go list: %s", stderr.String())
	deps := strings.Fields(string(out))
	require.Contains(t, deps, "govmm/vmm", "the listing is the binary's")
	for _, bad := range []string{"testing", "govmm/internal/kvmtest", "govmm/internal/guestrig", "govmm/internal/netns", "govmm/internal/promcheck",
		"github.com/stretchr/testify/require"} {
		assert.NotContains(t, deps, bad, "govmm links %s", bad)
	}
}

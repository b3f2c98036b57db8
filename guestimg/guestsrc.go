package guestimg

import (
	"bytes"
	"context"
	"embed"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// guestSources are the sources of the programs that run inside the
// default guest (/init, the demo service, the memory dirtier) and of the
// contract they share with the builder. They are compiled into every
// govmm binary, so that an installed govmm builds the default image in any
// directory: only the go command is needed, not the govmm checkout. The
// guest programs use nothing outside the standard library, so their
// temporary module needs no download.
//
//go:embed guest internal/guestproto
var guestSources embed.FS

// guestModuleGo is the go directive of the guest programs' temporary
// module: the oldest language version their sources need.
const guestModuleGo = "1.22"

// guestSourceFiles lists the embedded files that go into the guest
// programs (tests and test data left out), sorted.
func guestSourceFiles() ([]string, error) {
	var files []string
	err := fs.WalkDir(guestSources, ".", func(p string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case d.IsDir() && d.Name() == "testdata":
			return fs.SkipDir
		case d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go"):
			return nil
		}
		files = append(files, p)
		return nil
	})
	return files, err
}

// hashGuestSources writes the guest programs' sources into h (part of the
// image key).
func hashGuestSources(h io.Writer) error {
	files, err := guestSourceFiles()
	if err != nil {
		return fmt.Errorf("guest sources: %w", err)
	}
	fmt.Fprintf(h, "go %s\n", guestModuleGo)
	for _, f := range files {
		data, err := guestSources.ReadFile(f)
		if err != nil {
			return fmt.Errorf("guest sources: %w", err)
		}
		fmt.Fprintf(h, "file %s %d\n", f, len(data))
		h.Write(data)
	}
	return nil
}

// writeGuestModule lays the guest programs out in dir as module govmm (so
// their imports of govmm/guestimg/internal/guestproto resolve as in the
// checkout), with a go.mod that requires nothing.
func writeGuestModule(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	gomod := fmt.Sprintf("// Written by govmm's image builder: the guest programs only.\nmodule govmm\n\ngo %s\n", guestModuleGo)
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(gomod), 0o644); err != nil {
		return err
	}
	files, err := guestSourceFiles()
	if err != nil {
		return err
	}
	for _, f := range files {
		data, err := guestSources.ReadFile(f)
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, "guestimg", filepath.FromSlash(f))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// guestPrograms are the names under /bin by which the multi-call /init
// runs the other guest programs (guest/init dispatches on them).
var guestPrograms = []string{"govmm-demo", "govmm-dirtier"}

// buildGuestPrograms compiles /init, the guest's one multi-call binary
// (guest/init with guest/demo and guest/dirtier linked in; from the
// sources embedded in this binary, in a temporary module), static and
// stripped, and returns it with its symbolic links as a cpio archive.
func (b *builder) buildGuestPrograms(ctx context.Context) ([]byte, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("build guest programs: %w: it compiles the guest's /init and programs; install Go (https://go.dev/dl), or pass your own --kernel and --initrd", ErrNoGo)
	}
	if err := os.MkdirAll(filepath.Join(b.cache, "tmp"), 0o755); err != nil {
		return nil, fmt.Errorf("build guest programs: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Join(b.cache, "tmp"), "guest-")
	if err != nil {
		return nil, fmt.Errorf("build guest programs: %w", err)
	}
	defer os.RemoveAll(tmp)
	src, out := filepath.Join(tmp, "src"), filepath.Join(tmp, "out")
	if err := writeGuestModule(src); err != nil {
		return nil, fmt.Errorf("build guest programs: write sources: %w", err)
	}
	// One multi-call binary: /init, which runs the demo service and the
	// dirtier when called by their names (symbolic links to it).
	args := []string{"build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", filepath.Join(out, "init"), "./guestimg/guest/init"}
	start := time.Now()
	cmd := exec.CommandContext(ctx, goTool, args...)
	cmd.Dir = src
	// The module stands alone: no workspace, no vendoring, nothing to
	// download, whatever the caller's environment says.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64",
		"GOWORK=off", "GOFLAGS=-mod=mod", "GOPROXY=off", "GOTOOLCHAIN=local")
	if o, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build guest programs: %w:\n%s", err, o)
	}
	b.logf("built guest programs in %v", time.Since(start).Round(time.Millisecond))
	t := newTree()
	t.fileFrom("init", 0o755, filepath.Join(out, "init"))
	for _, name := range guestPrograms {
		t.symlink("bin/"+name, "/init")
	}
	var buf bytes.Buffer
	if err := t.writeNoParents(newCPIOWriter(&buf)); err != nil {
		return nil, fmt.Errorf("archive guest programs: %w", err)
	}
	return buf.Bytes(), nil
}

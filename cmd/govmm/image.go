package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"

	"govmm/guestimg"
)

const imageUsage = `Usage: govmm image build [--cache DIR] [--print]

Build the default guest image, or find it in the cache: Debian's kernel,
and an initramfs with busybox, the virtio and ext4 modules, mke2fs, and
govmm's /init, one binary that is also the guest's programs (the demo HTTP
service on port 80 and the memory dirtier).

The first build downloads Debian packages with apt-get (linux-image-amd64,
busybox-static, e2fsprogs and its libraries) and compiles the guest programs,
whose sources are part of this binary, with the go command (which must be in
PATH; it downloads nothing). It works in any directory. A later build with
nothing changed returns at once, without apt, go or the network.

The image is <cache>/images/<hash>/{vmlinuz,initrd.img,vmlinux} (vmlinux:
the kernel uncompressed, which run boots through PVH by default). The packages stay
in <cache>/debs; delete that directory to pick up newer ones.

Flags:
`

// cmdImage implements "govmm image build".
func cmdImage(args []string) error {
	fs := newFlagSet("image build", imageUsage)
	cache := fs.String("cache", guestimg.DefaultCacheDir(),
		"cache `directory`: $GOVMM_CACHE, else $XDG_CACHE_HOME/govmm, else ~/.cache/govmm")
	printPaths := fs.Bool("print", false, "print only the paths of the kernel (bzImage), the initrd and the uncompressed kernel (vmlinux), one per line in that order, for scripts")
	switch {
	case len(args) == 0:
		return usagef("image", "no subcommand: want build")
	case args[0] != "build":
		// "govmm image -h" and "govmm help image" land here too.
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		return usagef("image", "unknown subcommand %q: want build", args[0])
	}
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("image build", "unexpected argument %q", fs.Arg(0))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	img, err := buildImage(ctx, *cache)
	if err != nil {
		if errors.Is(err, guestimg.ErrNoApt) || errors.Is(err, guestimg.ErrNoGo) {
			return err // says what to do
		}
		return fmt.Errorf("image build: %w", err)
	}
	if *printPaths {
		fmt.Printf("%s\n%s\n%s\n", img.Kernel, img.Initrd, img.Vmlinux)
		return nil
	}
	fmt.Printf("kernel: %s\nvmlinux: %s\ninitrd: %s\n", img.Kernel, img.Vmlinux, img.Initrd)
	return nil
}

// buildImage builds the default image in cache (default: guestimg's), or
// finds it there, with the build's log and the package download's
// progress (bytes of the total: a bar on a terminal, lines elsewhere) on
// stderr.
func buildImage(ctx context.Context, cache string) (guestimg.Image, error) {
	bar := newTransferBar(os.Stderr, ctlIsTerminal(os.Stderr), "package download")
	defer bar.finish()
	return guestimg.Build(ctx, guestimg.Options{CacheDir: cache, Log: bar.interleave(),
		Progress: func(done, total int64) { bar.update(uint64(done), uint64(total), "") }})
}
